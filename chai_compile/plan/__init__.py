"""Plan: choose what to share under a budget by measured loss, refit, and write the plan (+ its weights)."""
