"""Tenants (data sets with their own label sets), their readers, and the LightningDataModule over them."""

from moe.data.clinc150 import Clinc150, load_clinc150
from moe.data.datamodule import TenantDataModule
from moe.data.files import TenantFile, read_examples, read_tenant_file
from moe.data.tenant import SPLITS, Example, Tenant, TenantDataError

__all__ = [
    "SPLITS",
    "Clinc150",
    "Example",
    "Tenant",
    "TenantDataError",
    "TenantDataModule",
    "TenantFile",
    "load_clinc150",
    "read_examples",
    "read_tenant_file",
]
