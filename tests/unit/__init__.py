"""Tests of one part at a time: no engine, no process of the mesh."""
