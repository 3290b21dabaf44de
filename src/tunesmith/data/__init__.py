"""Reading data files into rows, turning rows into examples, and splitting them reproducibly."""
