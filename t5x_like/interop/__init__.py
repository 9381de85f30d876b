"""Interop: importing and exporting Hugging Face models (hf).
"""
