"""kdzoo.distillers."""
