"""kdzoo.engine."""
