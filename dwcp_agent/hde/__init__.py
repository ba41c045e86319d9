"""HDE: the encoding that makes a migration cheaper than copying bytes."""
