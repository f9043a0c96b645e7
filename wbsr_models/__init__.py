"""Placeholder registering nothing yet."""
import wbsr_hook

wbsr_hook.prepare_basicsr_import()
wbsr_hook.register_all()
