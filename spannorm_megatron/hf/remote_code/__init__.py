"""The standalone model files written into every exported folder that needs our own class.

`configuration_spannorm.py` and `modeling_spannorm.py` import only torch and transformers; the
exporter copies them next to config.json, whose `auto_map` points transformers at them
(`trust_remote_code=True`). They are a package here only so the tests can import them directly.
"""

REMOTE_CODE_FILES = ("configuration_spannorm.py", "modeling_spannorm.py")
