"""Layer 7: grids of runs over one recipe (methods, shots, regularisers), one folder each."""
