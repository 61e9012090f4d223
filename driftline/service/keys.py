"""Redis keys the API reads (written by the stages) and the one it owns.

::

    dl:detect:summary          hash    slice_id -> JSON summary (detect stage)
    dl:detect:state:{p}        hash    slice_id -> {"state": SliceState snapshot, …} packed by
                                       ``consumers.checkpoint.encode_record`` (JSON + arrays)
    dl:recent                  stream  recent events: ``meta`` JSON and ``vec`` float32 bytes
    dl:reference:active        string  JSON {reference_id, path, who, at}, set by the API
    dl:thumb:{p}:{offset}:{id} string  an exemplar's JPEG thumbnail, made and cached by the API
                                       (:mod:`driftline.service.thumbnails`); TTL renewed on view
    dl:book:*                  the failure book (:mod:`driftline.alerts.store`); the API
                               writes only its lifecycle steps
"""

SUMMARY_KEY = "dl:detect:summary"
STATE_KEY_PREFIX = "dl:detect:state"
RECENT_KEY = "dl:recent"
ACTIVE_REFERENCE_KEY = "dl:reference:active"
BOOK_PREFIX = "dl:book"
