"""kdzoo.heads."""
