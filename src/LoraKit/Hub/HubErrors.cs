namespace LoraKit.Hub;

/// <summary>A problem reaching or reading the Hugging Face hub or its cache; the message is one line for the user.</summary>
public class HubException(string message, Exception? inner = null) : LoraKitException(message, inner);

/// <summary>The hub refused access (401/403): a gated or private repository, or a bad token.</summary>
public sealed class HubAccessException(string message) : HubException(message);

/// <summary>The repository, revision or file does not exist on the hub (404).</summary>
public sealed class HubNotFoundException(string message) : HubException(message);

/// <summary>The hub could not be reached, or broke off, and the cache does not hold what was asked for.</summary>
public sealed class HubNetworkException(string message, Exception? inner = null) : HubException(message, inner);

/// <summary>Offline mode (HF_HUB_OFFLINE) and the cache does not hold what was asked for.</summary>
public sealed class HubOfflineException(string message) : HubException(message);

/// <summary>What the hub sent does not check out: a sha256 or size mismatch, or a name or value a hub never sends.</summary>
public sealed class HubIntegrityException(string message) : HubException(message);
