"""Tools to test r1ray runs from the outside (chaos: random SIGKILLs). Base layer: no stage imports."""
