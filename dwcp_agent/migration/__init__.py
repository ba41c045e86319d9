"""Migration: sessions that move an object (image file, VM memory) between agents."""
