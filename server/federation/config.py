"""The federated job's settings, as this package imports them.

`FederationConfig` is defined in :mod:`offsite.server.federation_config`, outside this
package: the request validator (:mod:`offsite.server.job_options`) builds one to apply its
cross-field rules, and the job runner here imports the validator, so a definition inside
the package would make the two import each other.
"""

from offsite.server.federation_config import FederationConfig, FederationConfigError

__all__ = ["FederationConfig", "FederationConfigError"]
