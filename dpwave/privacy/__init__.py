"""Differential privacy: Poisson batch selection, clipping, noise, the DP mechanism and optimizer, accounting. Knows
nothing of images, models or data pipelines, nor of the config system (it imports only the leaf `dpwave.validation`)."""
from dpwave.privacy.clipping import ClipAux, clipped_grad, combine, partition
from dpwave.privacy.noise import NoiseState, noise_and_normalize
from dpwave.privacy.optimizers import dp_optimizer
from dpwave.privacy.accounting import calibrate_noise, epsilon
from dpwave.privacy.ledger import DpParams, LedgerMismatchError, PrivacyLedger
from dpwave.privacy.batch_selection import BatchOverflowError, PoissonSampler, PoissonSelection, seed_commitment
from dpwave.privacy.mechanism import DpSgdMechanism
from dpwave.privacy.secret import MIN_SECRET_BITS, DpSecret
from dpwave.privacy.statement import privacy_report, privacy_statement
from dpwave.privacy.audit import AuditResult, epsilon_lower_bound, one_run_audit
from dpwave.privacy.guard import BudgetGuard

__all__ = ["ClipAux", "clipped_grad", "combine", "partition", "NoiseState", "noise_and_normalize", "dp_optimizer",
           "calibrate_noise", "epsilon", "DpParams", "LedgerMismatchError", "PrivacyLedger", "BatchOverflowError",
           "PoissonSampler", "PoissonSelection", "seed_commitment", "DpSgdMechanism", "DpSecret", "MIN_SECRET_BITS",
           "privacy_report", "privacy_statement", "AuditResult", "epsilon_lower_bound", "one_run_audit", "BudgetGuard"]
