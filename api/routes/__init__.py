"""HTTP routes: each module is one resource; routes only parse, call a service and shape the answer."""
