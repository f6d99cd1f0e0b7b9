"""Dense models whose MLP blocks MoE layers can replace."""
