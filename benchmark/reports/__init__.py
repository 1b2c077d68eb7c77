"""Tables and figures from the results store."""
