"""MiSS (formerly Bone): one block matrix shared by every chunk of a Linear layer's input."""
