"""Small helpers shared across moshi-ttt."""
