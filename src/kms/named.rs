//! A key of a named provider. The trusted configuration names its
//! providers (`[providers.NAME]`), and volumes refer to keys by provider
//! name and key ID. Wraps record that name in the key reference (header
//! format 2), so a header says which configured provider wrapped it, not
//! just what kind; two providers of one kind (two keyrings, two Vaults) can
//! then never be confused. Unwraps accept the name, and the provider's kind
//! for format 1 headers, which recorded only that (the volume decides
//! whether those are allowed at all).

use std::sync::Arc;

use async_trait::async_trait;

use super::{KeyProvider, KeyRef, KeyVersions, KmsError, WrapContext, WrappedDek};
use crate::crypto::Dek;

pub struct NamedKey {
    name: String,
    inner: Arc<dyn KeyProvider>,
}

impl NamedKey {
    pub fn wrap(name: &str, inner: Arc<dyn KeyProvider>) -> Arc<dyn KeyProvider> {
        Arc::new(Self {
            name: name.to_owned(),
            inner,
        })
    }

    /// `key_ref` as the inner provider knows it (by kind), if it names this
    /// provider by name or by kind.
    fn inner_ref(&self, key_ref: &KeyRef) -> Option<KeyRef> {
        if key_ref.provider == self.name {
            Some(KeyRef {
                provider: self.inner.kind().to_owned(),
                ..key_ref.clone()
            })
        } else if key_ref.provider == self.inner.kind() {
            Some(key_ref.clone())
        } else {
            None
        }
    }

    fn named(&self, mut wrapped: WrappedDek) -> WrappedDek {
        wrapped.key_ref.provider = self.name.clone();
        wrapped
    }

    fn inner_wrapped(&self, wrapped: &WrappedDek) -> Result<WrappedDek, KmsError> {
        match self.inner_ref(&wrapped.key_ref) {
            Some(key_ref) => Ok(WrappedDek {
                key_ref,
                blob: wrapped.blob.clone(),
            }),
            None => Err(KmsError::no_provider(&wrapped.key_ref)),
        }
    }
}

#[async_trait]
impl KeyProvider for NamedKey {
    fn describe(&self) -> String {
        format!("{} ({})", self.name, self.inner.describe())
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn handles(&self, key_ref: &KeyRef) -> bool {
        self.inner_ref(key_ref)
            .is_some_and(|r| self.inner.handles(&r))
    }

    fn is_current_key(&self, key_ref: &KeyRef) -> bool {
        self.inner_ref(key_ref)
            .is_some_and(|r| self.inner.is_current_key(&r))
    }

    async fn generate_dek(&self, ctx: &WrapContext) -> Result<(Dek, WrappedDek), KmsError> {
        let (dek, wrapped) = self.inner.generate_dek(ctx).await?;
        Ok((dek, self.named(wrapped)))
    }

    async fn wrap(&self, dek: &Dek, ctx: &WrapContext) -> Result<WrappedDek, KmsError> {
        Ok(self.named(self.inner.wrap(dek, ctx).await?))
    }

    async fn unwrap(&self, wrapped: &WrappedDek, ctx: &WrapContext) -> Result<Dek, KmsError> {
        self.inner.unwrap(&self.inner_wrapped(wrapped)?, ctx).await
    }

    async fn unwrap_many(&self, items: &[(WrappedDek, WrapContext)]) -> Vec<Result<Dek, KmsError>> {
        let mut mapped = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for (i, (w, ctx)) in items.iter().enumerate() {
            match self.inner_wrapped(w) {
                Ok(w) => mapped.push((w, *ctx)),
                Err(e) => refused.push((i, e)),
            }
        }
        let mut answers = self.inner.unwrap_many(&mapped).await.into_iter();
        let mut refused = refused.into_iter().peekable();
        (0..items.len())
            .map(|i| match refused.peek() {
                Some((j, _)) if *j == i => Err(refused.next().expect("peeked").1),
                _ => answers.next().expect("one answer per item"),
            })
            .collect()
    }

    async fn wrap_many(&self, items: &[(&Dek, WrapContext)]) -> Vec<Result<WrappedDek, KmsError>> {
        let out = self.inner.wrap_many(items).await;
        out.into_iter().map(|r| r.map(|w| self.named(w))).collect()
    }

    async fn key_versions(&self) -> Result<KeyVersions, KmsError> {
        self.inner.key_versions().await
    }

    async fn rotate(&self) -> Result<KeyVersions, KmsError> {
        self.inner.rotate().await
    }

    async fn check(&self) -> Result<(), KmsError> {
        self.inner.check().await
    }
}
