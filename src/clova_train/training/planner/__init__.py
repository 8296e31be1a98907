"""`clova plan`'s model: GPU profiles (hardware), memory per GPU (memory), step time (steptime), every layout ranked (search), --calibrate (calibrate); training/plan.py is its public face."""
