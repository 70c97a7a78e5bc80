"""Policy reload (gateway.site._reload): a running site takes up a changed policy file, and keeps the
last good policy while the file on disk does not load."""

from __future__ import annotations

from fractions import Fraction

from gateway.policy import load_policy
from tests.helpers.policies import dump_policy, with_epsilon, write_policy
from tests.helpers.servers import client, wait_for


def test_policy_reload_keeps_last_good(start_site, token, tmp_path, site_data):
    policy = write_policy(tmp_path, site_data)
    site = start_site(policy=policy)
    good = load_policy(policy).policy
    # an unknown key is a file the loader refuses (no model can hold it, so this edit is textual)
    policy.write_text(policy.read_text().replace("site: north", "site: north\nunknown_key: 1"))
    wait_for(lambda: site.state.metrics.policy_reloads.labels("rejected")._value.get() == 1)
    with client(site, token) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.5).epsilon_charged == 0.5
    dump_policy(with_epsilon(good, max=Fraction(2)), policy)
    wait_for(lambda: site.state.metrics.policy_reloads.labels("ok")._value.get() == 1)
    with client(site, token) as c:
        assert c.query("SELECT count(*) FROM patients WHERE sex = 'M'", epsilon=2).epsilon_charged == 2
