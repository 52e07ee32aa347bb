"""How a run lives: its device, seeds and directories, resume policy, stop signals, the lockstep
multi-seed driver and the typed experiment builders shared by train and evaluate."""
