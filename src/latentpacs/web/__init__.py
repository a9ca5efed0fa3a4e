"""The archive on the web: DICOMweb (PS3.18), the viewer and ``/metrics``.

One Starlette application (:func:`latentpacs.web.app.build_app`) served by uvicorn in a
thread of the ``latentpacs serve`` process (:mod:`latentpacs.web.server`), beside the
DIMSE node and answering from the same :class:`~latentpacs.service.Service`: the same
archive, the same store and retrieve chains, the same limits. Route modules
(:mod:`~latentpacs.web.qido`, :mod:`~latentpacs.web.wado`, :mod:`~latentpacs.web.stow`,
:mod:`~latentpacs.web.viewer`) speak HTTP only and call the service; permissions come
from :mod:`latentpacs.web.auth`.
"""
