"""kdzoo.losses."""
