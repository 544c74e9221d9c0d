"""Knowledge bases exported from successful plans (parameter-wise TPP distributions) and the seed's
analyses (TPP distributions, Spearman correlations)."""
