"""Building a zoo: planning, running cohorts (locally or on Ray), committing their rows."""
