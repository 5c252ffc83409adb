"""Datasets and prompt templates."""
