"""Tables, wire messages and the domain rules that belong to the data."""
