"""Moved to `offsite.wire`, where the data owner's ClientApp may import it too; this name stays."""

from offsite.wire import (  # noqa: F401
    AdapterMismatchError,
    bound_update,
    check_same_layout,
    named_from_list,
    numpy_to_record,
    ordered_names,
    record_nbytes,
    record_to_numpy,
    record_to_state,
    state_to_record,
    update_norm,
)
