"""Knowledge bases exported from successful plans (parameter-wise TPP distributions)."""
