"""Op-level plumbing shared by the backends: mode codes, result types and the C++ extension wiring."""
