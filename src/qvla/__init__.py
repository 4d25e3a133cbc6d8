from qvla.envs import get_suite
