"""The example workers' logic: plain functions, no I/O besides the zettel store."""
