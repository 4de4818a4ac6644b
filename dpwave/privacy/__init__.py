"""Differential privacy: clipping, noise, DP optimizers, accounting. Knows nothing of images or models."""
from dpwave.privacy.clipping import ClipAux, clip_and_sum, clipped_grad, combine, partition
from dpwave.privacy.noise import NoiseState, dp_aggregate, noise_and_normalize
from dpwave.privacy.optimizers import dp_adam, dp_adamw, dp_optimizer, dp_sgd, noise_key, privatizer
from dpwave.privacy.accounting import calibrate_noise, epsilon
from dpwave.privacy.ledger import DpParams, LedgerMismatchError, PrivacyLedger
from dpwave.privacy.statement import privacy_report, privacy_statement
from dpwave.privacy.audit import AuditResult, epsilon_lower_bound, one_run_audit
from dpwave.privacy.guard import BudgetExhausted, BudgetGuard
