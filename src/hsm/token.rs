//! Finding a token in the module's slots, logging in, and initializing a fresh
//! token (used by dev mode and by tests on SoftHSM).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::HsmError;
use super::TokenSelector;
use crate::secret::Pin;

/// Loads the module and calls `C_Initialize` with OS locking.
///
/// A module already initialized by this process is accepted as is.
pub(crate) fn load_module(path: &std::path::Path) -> Result<Pkcs11, HsmError> {
    let pkcs11 = Pkcs11::new(path).map_err(|e| HsmError::ModuleLoad {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    initialize(&pkcs11)?;
    Ok(pkcs11)
}

/// Calls `C_Initialize` with OS locking; a module already initialized by this
/// process is accepted as is.
pub(crate) fn initialize(pkcs11: &Pkcs11) -> Result<(), HsmError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(HsmError::from_cryptoki("initialize module", e)),
    }
}

/// Finds the slot whose initialized token matches the selector.
pub(crate) fn find_slot(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<Slot, HsmError> {
    find_token(pkcs11, selector).map(|(slot, _)| slot)
}

/// Finds the slot whose initialized token matches the selector, and returns
/// it with the token's serial number.
pub(crate) fn find_token(pkcs11: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, String), HsmError> {
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::from_cryptoki("list slots", e))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| HsmError::from_cryptoki("read token info", e))?;
        let matches = match selector {
            TokenSelector::Label(label) => info.label().trim_end() == label,
            TokenSelector::Serial(serial) => info.serial_number().trim_end() == serial,
        };
        if matches {
            return Ok((slot, info.serial_number().trim_end().to_owned()));
        }
        present.push(format!("{:?}", info.label().trim_end()));
    }
    Err(HsmError::TokenNotFound {
        selector: match selector {
            TokenSelector::Label(l) => format!("label {l:?}"),
            TokenSelector::Serial(s) => format!("serial {s:?}"),
        },
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// Logs the user in on `session`. Already being logged in is success: login
/// state is shared by every session of the application.
pub(crate) fn login(session: &Session, pin: &Pin) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(&pin.to_auth_pin())) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange),
            _,
        )) => Err(HsmError::LoginRefused(rv)),
        Err(e) => Err(HsmError::from_cryptoki("log in", e)),
    }
}

/// A logged-in read-write session on the token `selector` names, outside the
/// pool: for tools that make a few calls and exit (a person's own token, the
/// raw `C_Sign` bench), never for the wallet path. Returns the module and
/// the slot too, for a caller that opens more sessions (the session holds
/// its own handle on the module).
pub fn tool_session(
    module: &std::path::Path,
    selector: &TokenSelector,
    pin: &Pin,
) -> Result<(Pkcs11, Slot, Session), HsmError> {
    let pkcs11 = load_module(module)?;
    let slot = find_slot(&pkcs11, selector)?;
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_cryptoki("open session", e))?;
    login(&session, pin)?;
    Ok((pkcs11, slot, session))
}

/// Initializes a token in the first free slot: sets its label and SO PIN, then
/// the user PIN. Used for dev-mode and test tokens on SoftHSM.
pub fn init_token(
    module: &std::path::Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<(), HsmError> {
    let pkcs11 = load_module(module)?;
    let free = pkcs11
        .get_slots_with_token()
        .map_err(|e| HsmError::from_cryptoki("list slots", e))?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .map(|info| !info.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| HsmError::TokenNotFound {
            selector: "an uninitialized token".into(),
            present: "only initialized tokens".into(),
        })?;
    pkcs11
        .init_token(free, &so_pin.to_auth_pin(), label)
        .map_err(|e| HsmError::from_cryptoki("initialize token", e))?;
    let session = pkcs11
        .open_rw_session(free)
        .map_err(|e| HsmError::from_cryptoki("open session", e))?;
    session
        .login(UserType::So, Some(&so_pin.to_auth_pin()))
        .map_err(|e| HsmError::from_cryptoki("log in as SO", e))?;
    let user: AuthPin = user_pin.to_auth_pin();
    session
        .init_pin(&user)
        .map_err(|e| HsmError::from_cryptoki("set user PIN", e))?;
    session
        .logout()
        .map_err(|e| HsmError::from_cryptoki("log out SO", e))?;
    Ok(())
}
