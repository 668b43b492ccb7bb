"""Request and response bodies (``JobCreate`` lives in ``simmim_service.spec``)."""
