from qvla.demo_run import COMPACT, DEMO_POLICY
from qvla.policies import POLICIES
from qvla.quant.methods import METHODS, split_method
from qvla.table import parse_setting


def test_the_demo_table_names_registered_methods_settings_and_policy():
    assert DEMO_POLICY in POLICIES
    for settings, methods in COMPACT:
        for s in settings:
            parse_setting(s)  # raises on a setting qvla table would refuse
        assert all(split_method(m)[0] in METHODS for m in methods), methods
    # the demo's point: QVLA at W8A8, W4A16 and W4A4 next to at least one baseline at each
    qvla_at = {s for settings, methods in COMPACT for s in settings if any(m.startswith("qvla") for m in methods)}
    assert qvla_at == {"W8A8", "W4A16", "W4A4"}
