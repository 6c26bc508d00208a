"""The `cxr` console script: wiring only, the logic lives in store/, worker/ and model/."""
