"""lm-evaluation-harness task folders shipped with florist-hf (pass this folder as an include path)."""
