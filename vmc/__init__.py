"""Transferable neural wavefunctions (Scherbela, Gerard and Grohs 2023) trained by VMC."""
