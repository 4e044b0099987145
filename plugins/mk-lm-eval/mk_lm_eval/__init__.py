"""mk-lm-eval: score merged language models with EleutherAI's lm-evaluation-harness."""
