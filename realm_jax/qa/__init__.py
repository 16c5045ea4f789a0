"""Open-QA fine-tuning and exact-match evaluation (ORQA/REALM recipe, DESIGN.md §1)."""
