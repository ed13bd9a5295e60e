"""kdzoo.teachers."""
