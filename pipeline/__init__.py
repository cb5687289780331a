"""compress.py's machinery: recipes, the stage runner and the report."""
