"""kdzoo.datasets."""
