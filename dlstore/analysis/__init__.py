"""Analyses of populations of trained runs, e.g. fitting scaling laws to their final losses."""
