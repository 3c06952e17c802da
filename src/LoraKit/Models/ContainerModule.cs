using static TorchSharp.torch;

namespace LoraKit.Models;

/// <summary>
/// A module whose child modules can be swapped after construction (an adapter wraps a Linear; a faster module replaces
/// a reference one). The public field of that name is updated too, because forward() reads the field.
/// </summary>
public abstract class ContainerModule(string name) : nn.Module<Tensor, Tensor>(name)
{
    /// <param name="keepPlace">
    /// Keep the child's place among this module's children (so named_parameters() keeps its order); otherwise the new
    /// child is registered last, as adapter wrapping has always done (adapter parameter order depends on it).
    /// </param>
    public void ReplaceChild(string childName, nn.Module<Tensor, Tensor> child, bool keepPlace = false)
    {
        var field = GetType().GetField(childName) ?? throw new ArgumentException($"{GetType().Name} has no child '{childName}'");
        if (!field.FieldType.IsAssignableFrom(child.GetType()))
            throw new ArgumentException($"{GetType().Name}.{childName} cannot hold a {child.GetType().Name}");
        if (ReferenceEquals(field.GetValue(this), child)) return; // already there: keep its registration
        field.SetValue(this, child);
        if (keepPlace && _internal_submodules.ContainsKey(childName))
        {
            _internal_submodules[childName] = child; // the ordered dictionary's indexer replaces in place
            return;
        }
        _internal_submodules.Remove(childName); // TorchSharp refuses to register a name twice
        register_module(childName, child);
    }

    /// <summary>
    /// Registers <paramref name="other"/>'s children under their names and in its order: a module built over another's
    /// children (a subclass swapped in after build) keeps the order named_parameters() lists them in.
    /// </summary>
    protected void RegisterChildrenOf(ContainerModule other)
    {
        foreach (var (childName, child) in other.named_children()) register_module(childName, child);
    }
}
