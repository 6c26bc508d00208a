"""SQL schema and state-changing functions shared by web and worker (no Flask, no TensorFlow)."""
