"""Label tables, splits and boxes: reading dataset CSVs into one in-memory form."""
