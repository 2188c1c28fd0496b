"""Small helpers shared by several rooms: image grids, plots."""
