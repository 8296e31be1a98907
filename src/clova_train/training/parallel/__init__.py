"""How the model is spread over devices: the layout, the process group, the DeepSpeed config and its validation, one engine per mode."""
